"""``python -m napari_diffcut`` runs the command line."""

from napari_diffcut.cli.main import main

raise SystemExit(main())
