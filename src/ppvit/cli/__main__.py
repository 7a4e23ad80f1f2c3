import sys

from ppvit.cli import main

sys.exit(main())
