"""`python -m thinkwise` is the `thinkwise` command."""

import sys

from thinkwise.cli import main

sys.exit(main())
