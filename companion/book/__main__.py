import sys

from companion.book.execute import main

sys.exit(main())
