import sys

from franca.cli import main

sys.exit(main())
