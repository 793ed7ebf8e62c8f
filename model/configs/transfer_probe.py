"""Frozen-encoder probe of the encoder-transfer experiment (model/transfer.py, docs/transfer.md): a fresh decoder
trained on ARef alone (expression -> box) over a frozen encoder, then judged by refer Acc@0.5 on held-out scenes.
`locca transfer` points `init_encoder_from` at each pretraining arm's checkpoint, and at none for the floor
(a frozen randomly initialised encoder). The recipe is the pretraining arms' on other scenes.
"""

from model.configs.transfer_pretrain import CONFIG as PRETRAIN

CONFIG = PRETRAIN.replace(
    task_weights=(0.0, 1.0, 0.0),
    freeze_encoder=True,
    steps=1000,
    curriculum_steps=300,
    data_start=100_000_000,  # scenes no pretraining arm saw
)
