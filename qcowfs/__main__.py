from qcowfs.cli import main

raise SystemExit(main())
