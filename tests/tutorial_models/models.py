"""Test double of the tutorial's ``models.py``: ``Encoder``, ``Attention``, ``DecoderWithAttention``.

Our own re-implementation (written from docs/architecture.md and the seed write-up) with the
tutorial's class names, attribute names, constructor signatures and math, so that a checkpoint
pickled from these classes has the tutorial's exact form (``models.Encoder`` ... as globals).
Imported as the top-level module ``models`` by the tests (``sys.path`` insert), as the tutorial's
``train.py`` did. Differences, all for offline tests: the ResNet is built without ImageNet
weights and its depth is a constructor argument (``arch``, default the tutorial's resnet101).

Legend: B batch, S image side, E embedding, H decoder hidden, D encoder channels, A attention,
P pixels (enc_size^2), T tokens, V vocabulary.
"""

import torch
import torchvision
from torch import nn


class Encoder(nn.Module):
    """ResNet without its pooling/classifier head, then adaptive pooling to a fixed grid.

    Args:
        encoded_image_size: side of the output grid (the tutorial's 14).
        arch: torchvision ResNet constructor name (the tutorial hard-codes resnet101).
    """

    def __init__(self, encoded_image_size=14, arch="resnet101"):
        super(Encoder, self).__init__()
        self.enc_image_size = encoded_image_size
        trunk = getattr(torchvision.models, arch)(weights=None)
        self.resnet = nn.Sequential(*list(trunk.children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        self.fine_tune()

    def forward(self, images):
        """(B, 3, S, S) normalised images -> (B, enc, enc, D) channels-last feature grid."""
        grid = self.adaptive_pool(self.resnet(images))
        return grid.permute(0, 2, 3, 1)

    def fine_tune(self, fine_tune=True):
        """Freeze the trunk, then let children 5.. (layer2-layer4) train if ``fine_tune``."""
        for p in self.resnet.parameters():
            p.requires_grad = False
        for child in list(self.resnet.children())[5:]:
            for p in child.parameters():
                p.requires_grad = fine_tune


class Attention(nn.Module):
    """Additive attention: weights over P pixels from the features and the decoder state."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super(Attention, self).__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out, decoder_hidden):
        """(B, P, D), (B, H) -> weighted encoding (B, D), alpha (B, P)."""
        joint = self.encoder_att(encoder_out) + self.decoder_att(decoder_hidden).unsqueeze(1)
        alpha = self.softmax(self.full_att(self.relu(joint)).squeeze(2))
        weighted = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)
        return weighted, alpha


class DecoderWithAttention(nn.Module):
    """LSTMCell decoder with gated soft attention (the tutorial's argument order)."""

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super(DecoderWithAttention, self).__init__()
        self.encoder_dim = encoder_dim
        self.attention_dim = attention_dim
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.vocab_size = vocab_size
        self.dropout = dropout
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=self.dropout)  # the float attribute becomes the module
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.init_weights()

    def init_weights(self):
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def load_pretrained_embeddings(self, embeddings):
        self.embedding.weight = nn.Parameter(embeddings)

    def fine_tune_embeddings(self, fine_tune=True):
        for p in self.embedding.parameters():
            p.requires_grad = fine_tune

    def init_hidden_state(self, encoder_out):
        """(B, P, D) -> h, c each (B, H) from the mean pixel feature."""
        mean = encoder_out.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def forward(self, encoder_out, encoded_captions, caption_lengths):
        """Teacher forcing, rows sorted by decreasing length (the tutorial's contract).

        Args:
            encoder_out: (B, enc, enc, D) from ``Encoder``.
            encoded_captions: (B, T) int64.
            caption_lengths: (B, 1) int64, incl. <start>/<end>.

        Returns:
            predictions (B, L, V), sorted captions (B, T), decode_lengths (list of B ints),
            alphas (B, L, P), sort_ind (B,): row i of the outputs is input row sort_ind[i].
        """
        batch_size = encoder_out.size(0)
        encoder_dim = encoder_out.size(-1)
        encoder_out = encoder_out.view(batch_size, -1, encoder_dim)  # (B, P, D)
        num_pixels = encoder_out.size(1)
        caption_lengths, sort_ind = caption_lengths.squeeze(1).sort(dim=0, descending=True)
        encoder_out = encoder_out[sort_ind]
        encoded_captions = encoded_captions[sort_ind]
        embeddings = self.embedding(encoded_captions)
        h, c = self.init_hidden_state(encoder_out)
        decode_lengths = (caption_lengths - 1).tolist()
        steps = max(decode_lengths)
        predictions = torch.zeros(batch_size, steps, self.vocab_size, device=encoder_out.device)
        alphas = torch.zeros(batch_size, steps, num_pixels, device=encoder_out.device)
        for t in range(steps):
            n = sum(length > t for length in decode_lengths)
            weighted, alpha = self.attention(encoder_out[:n], h[:n])
            weighted = self.sigmoid(self.f_beta(h[:n])) * weighted
            h, c = self.decode_step(torch.cat([embeddings[:n, t, :], weighted], dim=1), (h[:n], c[:n]))
            predictions[:n, t, :] = self.fc(self.dropout(h))
            alphas[:n, t, :] = alpha
        return predictions, encoded_captions, decode_lengths, alphas, sort_ind
