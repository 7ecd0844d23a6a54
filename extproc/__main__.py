import sys

from extproc.server import main

sys.exit(main())
