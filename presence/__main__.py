from presence.cli import main

raise SystemExit(main())
