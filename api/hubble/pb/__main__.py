"""``python -m api.hubble.pb [--force]``: compile the Hubble protos (``make setup`` runs it)."""

from api.hubble.pb import main

raise SystemExit(main())
