import sys

from kdkit.cli import main

sys.exit(main())
