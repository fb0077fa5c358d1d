from cascade_rcnn.cli import main

raise SystemExit(main())
