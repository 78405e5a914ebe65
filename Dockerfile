# The ETL image: `python main.py --follow` as a non-root user. No secrets inside: MASKING_KEY, the
# queue and the database come from the environment (see docker-compose.yml).
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 etl \
    && useradd --system --uid 10001 --gid etl --no-create-home --shell /usr/sbin/nologin etl

WORKDIR /app

# Dependencies in their own layer, rebuilt only when the lock changes. requirements.lock pins every
# package (transitive ones too) with its hashes: pip refuses anything else (pip-compile
# --generate-hashes from requirements.txt; see docs/CONTRIBUTING.md).
COPY requirements.lock .
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

# Only the application; tests, scripts and .env stay out (see also .dockerignore).
COPY main.py config.py models.py metrics_server.py ./
COPY etl/ etl/
COPY cli/ cli/
COPY aws/ aws/
COPY pii/ pii/
COPY database/ database/

USER 10001:10001

# Exec form: Python is PID 1 and receives SIGTERM itself (main.py then finishes the batch in hand).
CMD ["python", "main.py", "--follow"]
