from ext_proc.main import main

raise SystemExit(main())
