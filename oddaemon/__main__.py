from oddaemon.cli.main import main

raise SystemExit(main())
