"""`python -m daemon.providers.fake`: the fake provider in the foreground."""

import argparse
import sys

from daemon.providers.fake.cli import add_arguments
from daemon.providers.fake.cli import main

parser = argparse.ArgumentParser(prog="python -m daemon.providers.fake")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
