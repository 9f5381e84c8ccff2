"""Build a `tokenizers` backend that encodes exactly like a sentencepiece model file.

transformers 5 no longer ships slow tokenizers for most models, and its generic sentencepiece conversion drops the
dummy prefix and the whitespace clean-up that sentencepiece applies, so a fast tokenizer built from a
``tokenizer.model`` can split text differently from the model it claims to be. This converter follows the model's own
normalizer spec instead of a per-architecture guess.
"""

from __future__ import annotations

import os

SPIECE_UNDERLINE = "\u2581"

# sentencepiece piece types (sentencepiece_model.proto): control pieces are special, user-defined ones are not.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_UNIGRAM, _BPE = 1, 2


def read_sentencepiece_model(path: str | os.PathLike):
    """Parse a sentencepiece ``.model`` file into its protobuf.

    Raises:
        ValueError: the file is not a sentencepiece model (Llama 3 ships a tiktoken file under the same name).
    """
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(open(path, "rb").read())
    except DecodeError as error:
        raise ValueError(f"{path} is not a sentencepiece model file ({error}).") from error
    if not proto.pieces:
        raise ValueError(f"{path} is not a sentencepiece model file (it holds no pieces).")
    return proto


def sentencepiece_to_tokenizers(path: str | os.PathLike):
    """Convert a sentencepiece model file into a ``tokenizers.Tokenizer`` with the same segmentation.

    Args:
        path: a sentencepiece ``tokenizer.model``.

    Returns:
        A ``tokenizers.Tokenizer`` whose ids equal ``SentencePieceProcessor.encode`` on plain text, with the model's
        control and user-defined pieces registered as added tokens, and no post-processor (BOS/EOS are the wrapping
        tokenizer's business).

    Raises:
        ValueError: the model uses a feature this converter does not reproduce.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = read_sentencepiece_model(path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(
            f"{path} uses treat_whitespace_as_suffix, which swiftune cannot convert; keep its tokenizer.json."
        )
    if trainer.model_type not in (_UNIGRAM, _BPE):
        raise ValueError(f"{path} is a sentencepiece model of type {trainer.model_type}; only BPE and Unigram convert.")

    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    if trainer.model_type == _BPE:
        vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
        model = BPE(
            vocab,
            _bpe_merges(proto),
            unk_token=trainer.unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    else:
        model = Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    tokenizer = Tokenizer(model)

    # sentencepiece normalizes in this order: character map, whitespace clean-up, dummy prefix, escape spaces.
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE if norm.escape_whitespaces else " "))
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)

    decode = [decoders.Replace(SPIECE_UNDERLINE, " ")]
    if trainer.byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode)

    tokenizer.add_tokens(
        [
            AddedToken(piece.piece, normalized=False, special=piece.type in (_CONTROL, _UNKNOWN))
            for piece in proto.pieces
            if piece.type in (_UNKNOWN, _CONTROL, _USER_DEFINED)
        ]
    )
    return tokenizer


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE model, ranked like sentencepiece applies them.

    sentencepiece BPE keeps no merge list: at each step it joins the adjacent pair whose concatenation is the piece
    with the highest score. Ranking every split of every piece by that piece's score reproduces this.
    """
    normal = {piece.piece: (piece.score, index) for index, piece in enumerate(proto.pieces) if piece.type == 1}
    merges = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, index, normal[left][1], normal[right][1], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]
