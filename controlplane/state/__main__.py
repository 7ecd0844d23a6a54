import sys

from controlplane.state.service import main

sys.exit(main())
