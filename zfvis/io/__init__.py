"""Files, images and checks: the ground floor every other subpackage stands on.

- :mod:`~zfvis.io.errors`: zfvis's exception types;
- :mod:`~zfvis.io.checks`: checks of the numbers, paths and sizes a person gives;
- :mod:`~zfvis.io.parse`: the one parsing layer for numbers, ranges, targets and JSON files;
- :mod:`~zfvis.io.images`: loading images and listing data sets (Pillow);
- :mod:`~zfvis.io.atomic`: atomic file output, outputs together or not at all, folder locks;
- :mod:`~zfvis.io.ownership`: the ledger of what zfvis wrote;
- :mod:`~zfvis.io.environment`: matplotlib off screen, whatever the environment;
- :mod:`~zfvis.io.progress`: progress bars (tqdm).

Importing this package imports none of them: :mod:`zfvis.core` uses the errors and
checks without loading Pillow.
"""
