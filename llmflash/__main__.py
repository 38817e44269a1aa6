from llmflash.cli import main

raise SystemExit(main())
