import sys

from bench.unlearning.run import main

sys.exit(main())
