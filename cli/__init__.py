"""The command line: one module per command (or close group), each registering its own arguments
(`register(subparsers)`) beside its handler; `cli.parser.build_parser()` puts them together and
`cli.exit_codes` holds the one table of exit codes. main.py parses, dispatches and maps errors."""
