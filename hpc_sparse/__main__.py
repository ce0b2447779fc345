from hpc_sparse.cli import main

raise SystemExit(main())
