import sys

from bench.factor_fit.run import main

if __name__ == "__main__":  # the ranks it spawns import this module as __mp_main__
    sys.exit(main())
