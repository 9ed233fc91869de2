"""Classifier architectures, state-dict layout, heads, files, and label-table parsing."""
import numpy as np
import pytest
import torch

from fastfair.classifiers.data import read_label_table, resolve_labels
from fastfair.classifiers.heads import AttributeHead, celeba_head, head_from_names
from fastfair.classifiers.mobilenet_v3 import MobileNetV3Large
from fastfair.classifiers.model import AttributeClassifier, load_classifier, save_classifier


def test_mobilenet_v3_large_matches_torchvisions_layout():
    network = MobileNetV3Large(1000)
    assert sum(p.numel() for p in network.parameters()) == 5_483_032  # torchvision's documented count
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert len(shapes) == 312
    expected = {
        "features.0.0.weight": (16, 3, 3, 3), "features.0.1.running_var": (16,),
        "features.1.block.0.0.weight": (16, 1, 3, 3),  # first block: no expansion, depthwise first
        "features.4.block.2.fc1.weight": (24, 72, 1, 1), "features.13.block.2.fc1.weight": (168, 672, 1, 1),
        "features.15.block.3.0.weight": (160, 960, 1, 1), "features.16.0.weight": (960, 160, 1, 1),
        "classifier.0.weight": (1280, 960), "classifier.3.weight": (1000, 1280),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert "features.1.block.2.0.weight" not in shapes  # no SE in block 1
    # what the layout leaves unsaid, as torchvision's: hardswish from block 7 and in the stem, tail and classifier,
    # ReLU before (and inside every squeeze-excitation); BatchNorm eps 0.001, momentum 0.01
    kinds = [type(m).__name__ for m in network.modules()]
    assert (kinds.count("Hardswish"), kinds.count("ReLU"), kinds.count("Hardsigmoid")) == (21, 19, 8)
    assert isinstance(network.features[6].block[0][2], torch.nn.ReLU)
    assert isinstance(network.features[7].block[0][2], torch.nn.Hardswish)
    assert isinstance(network.classifier[1], torch.nn.Hardswish)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 46 and all((m.eps, m.momentum) == (0.001, 0.01) for m in norms)


def test_mobilenet_blocks_add_their_input_and_squeeze_excitation_scales_it():
    from fastfair.classifiers.mobilenet_v3 import LARGE, InvertedResidual, SqueezeExcitation

    torch.manual_seed(0)
    block = InvertedResidual(LARGE[2]).eval()  # 24 -> 24 channels, stride 1: a residual block
    torch.nn.init.zeros_(block.block[-1][1].weight)  # the projection's BatchNorm: the branch adds 0
    x = torch.randn(2, 24, 8, 8)
    assert torch.equal(block(x), x)
    excite = SqueezeExcitation(24, 8)
    for layer in (excite.fc1, excite.fc2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    assert torch.allclose(excite(x), x * 0.5)  # hardsigmoid(0) = 0.5 scales the input


def test_fairface_head_classifier_roundtrips_through_a_file_in_torchvision_layout(tmp_path):
    head = head_from_names(["gender", "race", "age"])
    assert head.num_outputs == 8 and head.slices["race"] == slice(2, 6)
    torch.manual_seed(0)
    classifier = AttributeClassifier(head).eval()
    path = str(tmp_path / "clf.safetensors")
    save_classifier(classifier, path)
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert keys == set(MobileNetV3Large(8).state_dict()) and "classifier.3.weight" in keys
    loaded = load_classifier(path)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert loaded.head == head and torch.equal(loaded(images), classifier(images))
    probabilities = loaded.probabilities(images)
    assert probabilities["race"].shape == (2, 4) and torch.allclose(probabilities["age"].sum(-1), torch.ones(2))


def test_public_code_state_dicts_load_given_the_head(tmp_path):
    # the public gender classifier: torchvision mobilenet_v3_large with classifier[3] = Linear(1280, 80)
    network = MobileNetV3Large(80)
    torch.save(network.state_dict(), tmp_path / "public.pt")
    with pytest.raises(ValueError, match="nothing says what its outputs mean: .*classifiers.<name>.attributes"):
        load_classifier(str(tmp_path / "public.pt"))
    loaded = load_classifier(str(tmp_path / "public.pt"), head=celeba_head())
    images = torch.rand(1, 3, 32, 32)
    male = loaded.probabilities(images)["Male"]
    logits = network.eval()(images)
    assert torch.allclose(male, logits.view(1, 40, 2)[:, 20].softmax(-1), atol=1e-6)  # the public code's reading
    with pytest.raises(ValueError, match="has 80 outputs"):
        load_classifier(str(tmp_path / "public.pt"), head=head_from_names(["gender"]))


def test_small_cnn_file_and_head_mismatch(tmp_path):
    head = head_from_names(["gender"])
    path = str(tmp_path / "small.safetensors")
    save_classifier(AttributeClassifier(head, "small_cnn", input_size=32, width=4), path)
    loaded = load_classifier(path)
    assert loaded.arch == "small_cnn" and loaded.input_size == 32 and loaded(torch.zeros(3, 3, 32, 32)).shape == (3, 2)
    with pytest.raises(ValueError, match="was asked for"):
        load_classifier(path, head=head_from_names(["race"]))
    from fastfair.classifiers.heads import Attribute

    with pytest.raises(ValueError, match=r"predicts gender\(2\), but gender\(2\) was asked for"):  # other classes
        load_classifier(path, head=AttributeHead([Attribute("gender", ("male", "female"))]))
    # a differing architecture or input size is refused, not dropped unseen; an agreeing one loads
    assert load_classifier(path, arch="small_cnn", input_size=32).input_size == 32
    with pytest.raises(ValueError, match="built with input_size 32, but 224 was asked for: leave input_size unset"):
        load_classifier(path, input_size=224)
    with pytest.raises(ValueError, match="built with architecture 'small_cnn', but 'mobilenet_v3_large' was asked"):
        load_classifier(path, arch="mobilenet_v3_large")
    with pytest.raises(ValueError, match="declares 2"):
        head.split(torch.zeros(1, 3))
    # weights of another architecture or width, without metadata: named, not a state-dict traceback
    bare = str(tmp_path / "bare.pt")
    torch.save(AttributeClassifier(head, "small_cnn", input_size=32, width=4).network.state_dict(), bare)
    with pytest.raises(ValueError, match=r"bare.pt: its weights are not a mobilenet_v3_large classifier's \(\d+ "
                                         r"missing, \d+ unexpected"):
        load_classifier(bare, head=head)
    with pytest.raises(ValueError, match=r"bare.pt: its weights are not a small_cnn classifier's .*shapes differ"):
        load_classifier(bare, head=head, arch="small_cnn", width=8)
    pickled = str(tmp_path / "pickled.safetensors")
    torch.save(AttributeClassifier(head, "small_cnn", input_size=32, width=4).network.state_dict(), pickled)
    with pytest.raises(ValueError, match=r"pickled.safetensors: not a safetensors file .*needs that suffix"):
        load_classifier(pickled, head=head)


def test_heads_validate_and_serialize():
    head = head_from_names(["gender", "race"])
    assert AttributeHead.from_json(head.to_json()) == head and head.describe() == "gender(2) | race(4)"
    assert celeba_head().num_outputs == 80 and celeba_head().index("Male") == 20
    with pytest.raises(ValueError, match="unknown attribute"):
        head_from_names(["hair"])
    from fastfair.classifiers.heads import Attribute

    with pytest.raises(ValueError, match="attribute names must be unique"):
        AttributeHead([Attribute("hair", ("dark", "blond")), Attribute("hair", ("short", "long"))])
    with pytest.raises(ValueError, match="'hair' needs at least 2 classes"):
        AttributeHead([Attribute("hair", ("dark",))])


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_fairface_csv_maps_seven_races_to_four_groups_and_age_buckets(tmp_path):
    rows = [("White", "Male", "20-29"), ("Middle Eastern", "Female", "40-49"), ("Latino_Hispanic", "Male", "3-9"),
            ("East Asian", "Female", "more than 70"), ("Southeast Asian", "Male", "30-39"), ("Black", "Female", "0-2"),
            ("Indian", "Male", "60-69")]
    text = "file,age,gender,race,service_test\n" + "".join(
        f"train/{i}.jpg,{age},{gender},{race},True\n" for i, (race, gender, age) in enumerate(rows))
    head, labels = resolve_labels(read_label_table(write(tmp_path, "fairface.csv", text)), ["gender", "race", "age"])
    assert head == head_from_names(["gender", "race", "age"])
    assert labels[:, 1].tolist() == [0, 0, 0, 3, 3, 1, 2]  # WMELH x3, Asian x2, Black, Indian (the public order)
    assert labels[:, 0].tolist() == [1, 0, 1, 0, 1, 0, 1]  # male = 1
    assert labels[:, 2].tolist() == [0, 1, 0, 1, 0, 0, 1]  # young (< 40) = 0
    bad = write(tmp_path, "bad.csv", "file,race\na.jpg,Martian\n")
    with pytest.raises(ValueError, match="line 2: cannot read 'Martian'"):
        resolve_labels(read_label_table(bad), ["race"])
    with pytest.raises(ValueError, match="no column 'race'"):
        resolve_labels(read_label_table(write(tmp_path, "norace.csv", "file,x\na.jpg,1\n")), ["race"])


def test_celeba_attribute_list_and_csv(tmp_path):
    from fastfair.classifiers.heads import CELEBA_ATTRIBUTES

    values = [["1" if j % 3 == 0 else "-1" for j in range(40)], ["-1" if j % 3 == 0 else "1" for j in range(40)]]
    txt = "2\n" + " ".join(CELEBA_ATTRIBUTES) + "\n" + "".join(
        f"00000{i + 1}.jpg  " + " ".join(v) + "\n" for i, v in enumerate(values))
    table = read_label_table(write(tmp_path, "list_attr_celeba.txt", txt))
    assert table.files == ["000001.jpg", "000002.jpg"]
    head, labels = resolve_labels(table, ["celeba40"])
    assert head == celeba_head() and labels[0, :4].tolist() == [1, 0, 0, 1]
    _, labels = resolve_labels(table, ["gender", "age"])  # from the Male and Young columns
    assert labels.tolist() == [[0, 0], [1, 1]]  # Male(20): -1, 1; Young(39): 1 -> young(0), -1 -> old(1)
    csv_text = "image_id," + ",".join(CELEBA_ATTRIBUTES) + "\n" + "".join(
        f"00000{i + 1}.jpg," + ",".join(v) + "\n" for i, v in enumerate(values))
    _, from_csv = resolve_labels(read_label_table(write(tmp_path, "attrs.csv", csv_text)), ["celeba40"])
    assert torch.equal(from_csv, resolve_labels(table, ["celeba40"])[1])


def test_label_table_headers_match_ignoring_case_and_spaces(tmp_path):
    path = write(tmp_path, "caps.csv", " File , Gender ,Race\n0.png,Female,White\n1.png,Male,Black\n")
    table = read_label_table(path)
    assert table.files == ["0.png", "1.png"]
    head, labels = resolve_labels(table, ["gender", "race"])
    assert head == head_from_names(["gender", "race"]) and labels.tolist() == [[0, 0], [1, 1]]
    with pytest.raises(ValueError, match="columns 'gender' and 'Gender' are one name .* rename or delete one"):
        read_label_table(write(tmp_path, "twice.csv", "file,gender,Gender\n0.png,Female,Male\n"))
    with pytest.raises(ValueError, match=r"line 3: no file name in column 'file'"):
        read_label_table(write(tmp_path, "nofile.csv", "file,gender\n0.png,Female\n,Male\n"))


def test_custom_attribute_refuses_empty_cells_and_merges_case_variants(tmp_path):
    from fastfair.classifiers.heads import Attribute

    with pytest.raises(ValueError, match=r"empty.csv, column 'hair': line 3 is empty \(1 empty row\(s\) in all\)"):
        resolve_labels(read_label_table(write(tmp_path, "empty.csv", "file,hair\na,blond\nb,\nc,dark\n")), ["hair"])
    table = read_label_table(write(tmp_path, "case.csv", "file,hair\na,Blond\nb,blond\nc,dark \nd,Dark\ne,BLOND\n"))
    head, labels = resolve_labels(table, ["hair"])
    assert head.attributes == [Attribute("hair", ("Blond", "dark"))]  # each spelled as in its first row
    assert labels.flatten().tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="line 3: cannot read an empty cell as one of"):
        resolve_labels(read_label_table(write(tmp_path, "g.csv", "file,gender\na,Male\nb,\n")), ["gender"])
    with pytest.raises(ValueError, match=r"attribute 'hair'.*: needs at least 2 distinct values, found \['dark'\]"):
        resolve_labels(read_label_table(write(tmp_path, "one.csv", "file,hair\na,dark\nb,Dark\n")), ["hair"])


def test_gender_spellings_read_as_female_or_male(tmp_path):
    table = read_label_table(write(tmp_path, "g.csv", "file,gender\na,M\nb,f\nc,Man\nd,WOMAN\ne, male \nf,Female\n"))
    assert resolve_labels(table, ["gender"])[1].flatten().tolist() == [1, 0, 1, 0, 1, 0]  # female 0, male 1


def test_a_face_image_reads_as_minus_one_to_one(tmp_path):
    from PIL import Image

    from fastfair.classifiers.data import load_face_image

    Image.new("RGB", (6, 4), (255, 0, 255)).save(tmp_path / "magenta.png")
    image = load_face_image(str(tmp_path / "magenta.png"), 4)
    assert torch.equal(image, torch.tensor([1.0, -1.0, 1.0])[:, None, None].expand(3, 4, 4))


def test_custom_classes_sort_numerically_only_when_all_are_integers(tmp_path):
    from fastfair.classifiers.heads import Attribute

    numbers = read_label_table(write(tmp_path, "n.csv", "file,level\na,10\nb,9\nc,-1\nd,9\n"))
    head, labels = resolve_labels(numbers, ["level"])
    assert head.attributes == [Attribute("level", ("-1", "9", "10"))] and labels.flatten().tolist() == [2, 1, 0, 1]
    mixed = read_label_table(write(tmp_path, "m.csv", "file,level\na,10\nb,9\nc,-1\nd,b\ne,x\n"))
    head, _ = resolve_labels(mixed, ["level"])  # text order: names fell between the negative and positive numbers
    assert head.attributes == [Attribute("level", ("-1", "10", "9", "b", "x"))]
    odd = read_label_table(write(tmp_path, "o.csv", "file,level\na,--5\nb,2\nc,²\n"))  # isdigit, but not int()
    assert resolve_labels(odd, ["level"])[0].attributes == [Attribute("level", ("--5", "2", "²"))]
    padded = read_label_table(write(tmp_path, "p.csv", "file,level\na,07\nb,7\nc,10\nd,-0\ne,0\n"))
    head, labels = resolve_labels(padded, ["level"])  # '07' is 7: one class, spelled as its first row
    assert head.attributes == [Attribute("level", ("-0", "07", "10"))] and labels.flatten().tolist() == [1, 1, 2, 0, 0]


def test_an_image_listed_twice_is_used_once_or_refused_when_its_labels_differ(tmp_path):
    from fastfair.classifiers.data import unique_rows

    table = read_label_table(write(tmp_path, "dup.csv", "file,gender,race\na.png,Male,White\nb.png,Female,Black\n"
                                                        "./a.png,male,Middle Eastern\n"))
    head, labels = resolve_labels(table, ["gender", "race"])
    assert unique_rows(table, head, labels) == [0, 1]  # ./a.png is a.png, with the same labels (race group WMELH)
    table = read_label_table(write(tmp_path, "conflict.csv", "file,gender,race\na.png,Male,White\nb.png,Female,Black\n"
                                                             "a.png,Female,White\n"))
    head, labels = resolve_labels(table, ["gender", "race"])
    with pytest.raises(ValueError, match=r"a.png is listed on lines 2 \(gender=male\) and 4 \(gender=female\) with "
                                         "different labels"):
        unique_rows(table, head, labels)


def test_validation_labels_are_aligned_to_the_training_classes_or_refused_naming_them(tmp_path):
    from fastfair.classifiers.data import align_labels

    train_head, _ = resolve_labels(read_label_table(write(tmp_path, "t.csv", "file,hair\na,blond\nb,dark\nc,red\n")),
                                   ["hair"])
    val_head, val = resolve_labels(read_label_table(write(tmp_path, "v.csv", "file,hair\nd,Red\ne,Blond\nf,dark\n")),
                                   ["hair"])
    assert val_head.classes("hair") == ("Blond", "dark", "Red")  # other spellings, sorted ignoring case
    assert align_labels(train_head, val_head, val, "v").flatten().tolist() == [2, 0, 1]
    val_head, val = resolve_labels(read_label_table(write(tmp_path, "w.csv", "file,hair\nd,grey\ne,blond\nf,dark\n")),
                                   ["hair"])
    with pytest.raises(ValueError, match=r"w: the classes differ .*\(hair lacks red; hair has grey, which the "
                                         r"training rows lack\)"):
        align_labels(train_head, val_head, val, "w")


def test_numeric_ages_split_at_40_and_celeba_zero_flags_read_as_no(tmp_path):
    """age: '< 40 young, else old' (a UTKFace-style number column); CelebA flags: 1 yes, -1 or 0 no."""
    ages = write(tmp_path, "ages.csv", "file,age\na.jpg,39.5\nb.jpg,40\nc.jpg,41\n")
    assert resolve_labels(read_label_table(ages), ["age"])[1][:, 0].tolist() == [0, 1, 1]
    celeba = write(tmp_path, "zero.csv", "image_id,Male,Young\na.jpg,0,1\nb.jpg,1,0\n")
    _, labels = resolve_labels(read_label_table(celeba), ["gender", "age"])
    assert labels.tolist() == [[0, 0], [1, 1]]  # Male 0 -> female; Young 0 -> old


def test_label_table_mistakes_are_refused_naming_the_fix(tmp_path):
    from fastfair.classifiers.heads import Attribute

    for name, text in (("nan.csv", "file,age\na.jpg,20-29\nb.jpg,nan\n"), ("inf.csv", "file,age\na.jpg,30\nb.jpg,inf\n")):
        with pytest.raises(ValueError, match=r"line 3: cannot read '(nan|inf)' as one of"):  # not an old person
            resolve_labels(read_label_table(write(tmp_path, name, text)), ["age"])
    for header in ("file,gender, gender", "file,gender,gender"):  # the second column was read, silently
        with pytest.raises(ValueError, match=r"columns 'gender' and 'gender' are one name"):
            read_label_table(write(tmp_path, "twice.csv", f"{header}\na.png,Male,Female\n"))
    trailing = read_label_table(write(tmp_path, "trailing.csv", "file,gender,,\na.png,Male,,\nb.png,Female,,\n"))
    assert resolve_labels(trailing, ["gender"])[1].flatten().tolist() == [1, 0]  # unnamed columns: not read
    with pytest.raises(ValueError, match=r"attribute 'gender': needs a column 'gender' or CelebA's 'Male'; the "
                                         r"table's columns are \['sex'\]"):
        resolve_labels(read_label_table(write(tmp_path, "sex.csv", "file,sex\na.png,Male\n")), ["gender"])
    celeba = read_label_table(write(tmp_path, "c.csv", "image_id,Male,Young\na.jpg,1,1\n"))
    with pytest.raises(ValueError, match="celeba40 .* stands alone"):
        resolve_labels(celeba, ["celeba40", "gender"])
    with pytest.raises(ValueError, match="a count line and nothing else"):
        read_label_table(write(tmp_path, "count.txt", "0\n"))
    with pytest.raises(ValueError, match="columns 'Male' and 'Male' are one name"):
        read_label_table(write(tmp_path, "list.txt", "1\nMale Male\na.jpg 1 -1\n"))
    first = resolve_labels(read_label_table(write(tmp_path, "l.csv", "file,tone\na,dark\nb,Light\n")), ["tone"])[0]
    second = resolve_labels(read_label_table(write(tmp_path, "d.csv", "file,tone\na,Dark\nb,light\n")), ["tone"])[0]
    assert first.attributes == [Attribute("tone", ("dark", "Light"))]  # one order whatever the first row's case
    assert second.attributes == [Attribute("tone", ("Dark", "light"))]


def test_an_image_named_by_its_absolute_path_and_relative_to_the_data_folder_is_one_image(tmp_path):
    from fastfair.classifiers.data import unique_rows

    absolute = tmp_path / "img" / "a.png"
    table = read_label_table(write(tmp_path, "both.csv", f"file,gender\na.png,Male\nb.png,Female\n{absolute},Male\n"))
    head, labels = resolve_labels(table, ["gender"])
    assert unique_rows(table, head, labels, str(tmp_path / "img")) == [0, 1]
    assert unique_rows(table, head, labels) == [0, 1, 2]  # without the folder, the names alone differ


def test_every_unreadable_row_is_counted_at_once(tmp_path):
    """Rows of 'Other': the error named one row alone, one rerun per bad row; lines as an editor numbers them."""
    from fastfair.classifiers.data import read_label_table, resolve_labels

    rows = [f"{k}.png,{'Other' if k % 3 == 0 else 'Male'}" for k in range(1, 10)] + ["10.png,Unknown", "11.png,"]
    (tmp_path / "t.csv").write_text("file,gender\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"gender'?, 5 rows \(e.g. lines 4, 7, 10, 11, 12\): cannot read 'Other', "
                                         r"'Unknown', an empty cell as one of .*; map them to a class or delete"):
        resolve_labels(read_label_table(str(tmp_path / "t.csv")), ["gender"])


def test_integers_written_with_a_zero_fraction_are_those_integers(tmp_path):
    """pandas writes an integer column holding a NaN as 1.0, 2.0: 1 and 1.0 were two classes, in text order."""
    from fastfair.classifiers.data import read_label_table, resolve_labels

    (tmp_path / "t.csv").write_text("file,skin,Male\na.png,1,1.0\nb.png,1.0,-1.0\nc.png,10.0,0\nd.png,2.0,1\n")
    head, labels = resolve_labels(read_label_table(str(tmp_path / "t.csv")), ["skin", "Male"])
    assert head.classes("skin") == ("1", "2.0", "10.0")
    assert labels.tolist() == [[0, 1], [0, 0], [2, 0], [1, 1]]


@pytest.mark.parametrize("size", [(36, 12), (12, 36)])
def test_a_face_image_is_its_centre_square_resized(tmp_path, size):
    """The square is cut from the source (a 1 x 4000 image was first resized whole to 224 x 896000, 800 MB a load):
    inside its border (where the filter reads past the square) the centre square resized alone, up to rounding."""
    from PIL import Image

    from fastfair.classifiers.data import load_face_image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image.save(tmp_path / "wide.png")
    side = min(size)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    image.crop((left, top, left + side, top + side)).save(tmp_path / "square.png")
    wide, square = (load_face_image(str(tmp_path / name), 8) for name in ("wide.png", "square.png"))
    # PIL resizes in two 8-bit passes: the rows of a tall image's first pass differ by a rounding (1 of 255)
    assert wide.shape == (3, 8, 8) and (wide - square)[:, 1:-1, 1:-1].abs().max() <= 1.001 / 127.5
    Image.fromarray(rng.integers(0, 256, (4000, 1, 3), dtype=np.uint8)).save(tmp_path / "thin.png")
    assert load_face_image(str(tmp_path / "thin.png"), 224).shape == (3, 224, 224)


def test_a_table_with_blank_lines_first_or_other_separators_is_read_or_explained(tmp_path):
    from fastfair.classifiers.data import read_label_table

    (tmp_path / "blank.csv").write_text("\n\nfile,gender\na.png,Male\n")  # the header was read as empty
    assert read_label_table(str(tmp_path / "blank.csv")).files == ["a.png"]
    for separator, name in (("\t", "tabs"), (";", "semicolons")):
        (tmp_path / "t.csv").write_text(f"file{separator}gender\na.png{separator}Male\n")
        with pytest.raises(ValueError, match=f"look separated by {name}: save it comma-separated"):
            read_label_table(str(tmp_path / "t.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="no file-name column"):
        read_label_table(str(tmp_path / "empty.csv"))


def test_label_table_errors_name_the_file_lines(tmp_path):
    """Blank lines (before the header and between rows) and a quoted cell spanning two lines: the error names the
    line an editor shows, not the row's index among the data rows (CelebA's list too, after its two header lines)."""
    from fastfair.classifiers.data import read_label_table, resolve_labels

    (tmp_path / "t.csv").write_text('\n\nfile,gender,note\na.png,Male,"two\nlines"\n\nb.png,Martian,x\n')
    table = read_label_table(str(tmp_path / "t.csv"))
    assert table.files == ["a.png", "b.png"] and table.lines == [4, 7]
    with pytest.raises(ValueError, match="gender'?, line 7: cannot read 'Martian'"):
        resolve_labels(table, ["gender"])
    # a line of spaces is a row (csv skips empty lines only), last or between rows; a header cell over two lines
    for text, line in (("file,gender\na.jpg,male\nb.jpg,female\n  \n", 4), ("file,gender\na.jpg,male\n\t\nb,x\n", 3),
                       ('"file",gender\na.jpg,male\n,female\n', 3), ('file,"gen\nder"\n,female\n', 3)):
        (tmp_path / "blank.csv").write_text(text)
        with pytest.raises(ValueError, match=f"line {line}: no file name in column 'file'"):
            read_label_table(str(tmp_path / "blank.csv"))
    (tmp_path / "list.txt").write_text("2\nMale Young\na.jpg 1 -1\n\nb.jpg 1\n")
    with pytest.raises(ValueError, match=r"line 5 \(b.jpg\) do not have a file name and 2 values"):
        read_label_table(str(tmp_path / "list.txt"))
    (tmp_path / "list.txt").write_text("2\nMale Young\na.jpg 1 -1\n\nb.jpg 2 1\n")
    with pytest.raises(ValueError, match="line 5: cannot read '2' as a CelebA flag"):
        resolve_labels(read_label_table(str(tmp_path / "list.txt")), ["Male"])
