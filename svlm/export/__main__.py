import sys

from svlm.export import main

sys.exit(main())
