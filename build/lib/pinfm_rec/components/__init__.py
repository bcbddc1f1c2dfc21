"""TorchX components of pinfm_rec (``torchx run components/pinfm.py:pretrain ...``)."""
