"""Import: patch datasets into a patch store (PatchCamelyon HDF5 files, class-per-folder images).

Each split of a dataset becomes one group of the store, whose ``split``
attribute (``training``, ``validation`` or ``test``) ``wsiflow train`` keeps
(:func:`models.data.split_slides`)::

    PCAM/camelyonpatch_level_2_split_train_x.h5   x (N, 96, 96, 3) uint8
    PCAM/camelyonpatch_level_2_split_train_y.h5   y (N, 1, 1, 1), 1: tumor in the centre 32 px
    (valid and test alike)                        -> groups pcam_train, pcam_valid, pcam_test

    FOLDER/<class>/*.png                          -> FOLDER_train, FOLDER_valid (split here)
    FOLDER/{train,valid,test}/<class>/*.png       -> FOLDER_train, FOLDER_valid, FOLDER_test

Patches are read and written in blocks of whole chunks (bounded memory).
A dataset records no tumor or tissue fraction and no position on a slide:
those arrays hold NaN and -1. A group is marked complete last; an
interrupted import redoes the groups it did not finish, and a finished one
with the same inputs and settings is skipped.

- ``parts``: one split of a dataset (``Part``) and the split names.
- ``dataset``: ``find_parts``, the splits of a PCam folder or a folder of class folders.
- ``pcam``: PatchCamelyon's ``*_{train,valid,test}_{x,y}.h5`` files.
- ``folders``: class-per-folder images, with or without split folders.
- ``write``: ``import_parts`` writes each split into its group of the store.
"""
