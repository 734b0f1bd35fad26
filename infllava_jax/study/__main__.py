from infllava_jax.study.run import main

raise SystemExit(main())
