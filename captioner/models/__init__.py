"""The Show, Attend and Tell model in plain PyTorch (no Lightning, no Hydra)."""

from captioner.models.attention import AdditiveAttention
from captioner.models.captioner import Captioner, CaptionerOutput, SampleOutput
from captioner.models.decoder import (AttentionLSTMDecoder, DecoderOutput, DecoderState,
                                      StepOutput, load_glove_embeddings)
from captioner.models.encoder import ImageEncoder

__all__ = ["AdditiveAttention", "AttentionLSTMDecoder", "Captioner", "CaptionerOutput", "SampleOutput",
           "DecoderOutput", "DecoderState", "ImageEncoder", "StepOutput",
           "load_glove_embeddings"]
