"""The command line: absl flags, gin parsing and registration, the entry point."""
