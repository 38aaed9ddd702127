import sys

from hybridserve.cli import main

sys.exit(main())
