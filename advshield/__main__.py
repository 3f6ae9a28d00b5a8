from advshield.cli import main

raise SystemExit(main())
