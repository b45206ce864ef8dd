"""`python -m moeconv.cli …` (torchrun runs the CLI this way): the same app as the `moeconv` command."""
import sys

from moeconv.cli import app, skip_exit_collections

skip_exit_collections()
sys.exit(app())
