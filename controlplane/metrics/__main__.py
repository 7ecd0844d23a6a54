import sys

from controlplane.metrics.service import main

sys.exit(main())
