"""`python -m bench.grpc`."""

from bench.grpc.run import main

raise SystemExit(main())
