import sys

from ntk_poison.cli import main

sys.exit(main())
