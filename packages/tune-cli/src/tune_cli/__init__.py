"""tune-cli: the thin `tune` command. Heavy packages are imported inside each command."""
