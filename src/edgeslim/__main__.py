from edgeslim.cli import main

raise SystemExit(main())
