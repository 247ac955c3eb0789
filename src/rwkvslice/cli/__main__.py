import sys

from rwkvslice.cli import main

sys.exit(main())
