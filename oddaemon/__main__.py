from oddaemon.cli import main

raise SystemExit(main())
