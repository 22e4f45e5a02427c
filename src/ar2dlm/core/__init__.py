"""What every stage stands on: the settings error, validation of settings, and the one reader/writer of user files."""
