"""The segmentation backends and their registry: everything that turns a CT volume into a liver mask.

``registry`` names the models and loads one (importable without torch or nnunetv2);
``default`` runs the packaged whole-liver network (``unet``, ``weights``); ``nnunet`` and the
``nnunet_v1*`` modules run nnU-Net model folders. The measurement modules beside this package
see a backend only through ``liverfat.inference.backend.Backend``.
"""
