"""The neutral base every layer may use and that uses none of them: the error type, files written
atomically, user records read with file:line errors, the config loader's mechanics, logging, the
offline environment and the locations of shipped model assets."""
