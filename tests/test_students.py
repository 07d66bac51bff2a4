import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from emocompress.compression.export import quantize
from emocompress.models import pretrained
from emocompress.models.loading import load_artifact, load_folder
from emocompress.models.students import (
    SmallEncoderClassifier,
    SmallEncoderConfig,
    build_student,
    every_other_layer,
    keep_layers,
)

ID2LABEL = {0: "anger", 1: "joy", 2: "love"}


@pytest.fixture
def teacher(tiny_teacher_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture
def tokenizer(tiny_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.mark.parametrize("layers", [[0], [1], [0, 1]])
def test_keep_layers_copies_exactly_the_chosen_teacher_layers(teacher, layers):
    student = keep_layers(teacher, layers)
    assert student.config.num_hidden_layers == len(layers)
    assert len(student.bert.encoder.layer) == len(layers)
    teacher_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        if ".encoder.layer." in name:
            i, rest = name.split(".encoder.layer.")[1].split(".", 1)
            source = f"bert.encoder.layer.{layers[int(i)]}.{rest}"
        else:  # embeddings, pooler, head
            source = name
        assert torch.equal(value, teacher_state[source]), name
    assert teacher.config.num_hidden_layers == 2  # the teacher is untouched
    assert len(teacher.bert.encoder.layer) == 2


@pytest.mark.parametrize("layers", [[], [2], [1, 0], [0, 0], [-1]])
def test_keep_layers_rejects_impossible_layer_lists(teacher, layers):
    with pytest.raises(ValueError, match="model.student_layers must be increasing layer numbers in \\[0, 1\\]"):
        keep_layers(teacher, layers)


def test_every_other_layer_keeps_the_last():
    assert every_other_layer(12) == [1, 3, 5, 7, 9, 11]
    assert every_other_layer(1) == [0]


def test_layer_student_round_trips_through_save_and_load(teacher, tmp_path):
    student = keep_layers(teacher, [1]).eval()
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 20, (3, 7))
    torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


@pytest.mark.parametrize("encoder", ["bilstm", "meanpool", "cnn"])
def test_small_encoder_round_trips_and_ignores_padding(encoder, tmp_path):
    torch.manual_seed(0)
    model = SmallEncoderClassifier(SmallEncoderConfig(vocab_size=50, embedding_dim=8, hidden_size=6, encoder=encoder,
                                                      num_labels=3)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 3)
    # a text alone gives the same logits as in a right-padded batch
    torch.testing.assert_close(model(input_ids=ids[:1, :3]).logits[0], logits[0])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()  # registered Auto class
    assert isinstance(loaded, SmallEncoderClassifier)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("encoder", ["bilstm", "meanpool", "cnn"])
def test_students_saved_as_recurrent_classifier_still_load(encoder, tmp_path):
    # config.json as written before the rename: model_type emocompress-recurrent, architectures RecurrentClassifier
    torch.manual_seed(0)
    model = SmallEncoderClassifier(SmallEncoderConfig(vocab_size=50, embedding_dim=8, hidden_size=6, encoder=encoder,
                                                      num_labels=3, id2label=ID2LABEL)).eval()
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    saved = json.loads(config_file.read_text())
    assert (saved["model_type"], saved["architectures"]) == ("emocompress-small-encoder", ["SmallEncoderClassifier"])
    config_file.write_text(json.dumps({**saved, "model_type": "emocompress-recurrent",
                                       "architectures": ["RecurrentClassifier"]}))
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    expected = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    for loaded in (pretrained.load_model(str(tmp_path / "old")),
                   AutoModelForSequenceClassification.from_pretrained(tmp_path / "old"), load_folder(tmp_path / "old")):
        assert type(loaded) is SmallEncoderClassifier and type(loaded.config) is SmallEncoderConfig
        assert loaded.config.encoder == encoder and loaded.config.id2label == ID2LABEL
        torch.testing.assert_close(loaded.eval()(input_ids=ids, attention_mask=(ids != 0).long()).logits, expected,
                                   rtol=0, atol=0)
    assert type(AutoConfig.from_pretrained(tmp_path / "old")) is SmallEncoderConfig
    # a torch INT8 folder of such a student, written then (int8.json beside the old config.json), loads too
    int8 = tmp_path / "int8"
    quantize(model, "torch", out_dir=int8)
    (int8 / "config.json").write_text(config_file.read_text())
    (int8 / "artifact.json").rename(int8 / "int8.json")
    assert load_artifact(int8)(input_ids=ids, attention_mask=(ids != 0).long()).logits.argmax(-1).tolist() == \
        expected.argmax(-1).tolist()
    # saved again, it writes the current names
    loaded.save_pretrained(tmp_path / "new")
    resaved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert resaved["model_type"] == "emocompress-small-encoder"
    assert resaved["architectures"] == ["SmallEncoderClassifier"]


def test_small_encoder_learns_and_computes_its_loss():
    torch.manual_seed(0)
    model = SmallEncoderClassifier(SmallEncoderConfig(vocab_size=20, embedding_dim=8, hidden_size=8, num_labels=2))
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    labels = torch.tensor([0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    first = model(input_ids=ids, labels=labels).loss
    for _ in range(20):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    assert model(input_ids=ids, labels=labels).loss < first / 4


def test_small_encoder_config_rejects_unknown_encoder():
    with pytest.raises(ValueError, match="encoder must be one of \\['bilstm', 'meanpool', 'cnn'\\]"):
        SmallEncoderConfig(encoder="gru")
    with pytest.raises(ValueError, match="kernel_sizes must be positive"):
        SmallEncoderConfig(encoder="cnn", kernel_sizes=[3, 0])


def test_cnn_student_reads_texts_shorter_than_its_widest_kernel():
    # a 1-token text still has windows of 5 (zeros beyond its ends), and padding does not reach them
    torch.manual_seed(0)
    model = SmallEncoderClassifier(SmallEncoderConfig(vocab_size=20, embedding_dim=4, hidden_size=3, encoder="cnn",
                                                      num_labels=2)).eval()
    alone = model(input_ids=torch.tensor([[7]])).logits
    batch = model(input_ids=torch.tensor([[7, 0, 0, 0, 0, 0], [7, 8, 9, 10, 11, 12]]),
                  attention_mask=torch.tensor([[1, 0, 0, 0, 0, 0], [1] * 6])).logits
    torch.testing.assert_close(batch[:1], alone)
    assert not torch.allclose(batch[1], alone[0])


def test_build_student_layers_keeps_the_given_layers_and_trains_them(teacher):
    student = build_student("layers", teacher, ID2LABEL, layers=[1])
    assert type(student) is type(teacher) and student is not teacher
    assert len(student.bert.encoder.layer) == 1 and student.classifier.out_features == 3
    assert all(p.requires_grad for p in student.parameters())
    assert not {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}  # a copy


@pytest.mark.parametrize(("encoder", "params"), [
    # embeddings V*E + per direction an LSTM 4H(E+H) + 8H biases + head 2H*C + C
    ("bilstm", lambda v, e, h, c: v * e + 2 * (4 * h * (e + h) + 8 * h) + 2 * h * c + c),
    # embeddings V*E + feed-forward E*H + H + head H*C + C
    ("meanpool", lambda v, e, h, c: v * e + e * h + h + h * c + c),
    # embeddings V*E + per kernel width k in (3, 4, 5) k*E*H + H + head 3H*C + C
    ("cnn", lambda v, e, h, c: v * e + sum(k * e * h + h for k in (3, 4, 5)) + 3 * h * c + c),
])
def test_build_student_small_encoder_sizes(teacher, tokenizer, encoder, params):
    student = build_student(encoder, teacher, ID2LABEL, tokenizer=tokenizer, embedding_dim=8, hidden_size=6)
    assert isinstance(student, SmallEncoderClassifier) and student.config.encoder == encoder
    assert student.config.id2label == ID2LABEL and student.classifier.out_features == 3
    assert student.config.pad_token_id == tokenizer.pad_token_id
    assert sum(p.numel() for p in student.parameters()) == params(len(tokenizer), 8, 6, 3)


def test_build_student_pretrained_is_what_the_builder_returns(teacher, tiny_model_dir):
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3,
                                                               ignore_mismatched_sizes=True)
    student = build_student("pretrained", teacher, ID2LABEL, pretrained_builder=lambda: fresh)
    assert student is fresh and student.config.num_hidden_layers == 2 and student.classifier.out_features == 3


@pytest.mark.parametrize(("kind", "error", "message"), [
    ("layers", TypeError, "needs layers"), ("pretrained", TypeError, "needs pretrained_builder"),
    ("bilstm", TypeError, "needs tokenizer"), ("gru", ValueError, "model.student must be one of"),
])
def test_build_student_says_what_is_missing(teacher, kind, error, message):
    with pytest.raises(error, match=message):
        build_student(kind, teacher, ID2LABEL)
