from lmlab.commands import main

raise SystemExit(main())
