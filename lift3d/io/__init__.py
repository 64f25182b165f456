"""What lift3d reads is checked here before anything is built from it; what it writes goes through here.

- ``lift3d.io.errors``: ``Lift3dError``, the one base of every user-facing error.
- ``lift3d.io.budget``: sizes implied by a header or a config, checked against memory before allocation.
- ``lift3d.io.paths``: paths named inside files stay inside their folder.
- ``lift3d.io.schemas``: typed schemas of every JSON file lift3d reads (pydantic), and the one reader.
- ``lift3d.io.offline``: nothing lift3d does reaches a model hub.
- ``lift3d.io.writing``: run-folder locks, atomic files and the clean-up of temporary ones; no write follows a link.
- ``lift3d.io.tables``: CSV cells safe to open in a spreadsheet.
"""
