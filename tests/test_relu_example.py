from golden import check_golden, gradcheck_layer


def test_relu_golden():
    check_golden("relu")


def test_relu_gradcheck():
    gradcheck_layer('type: "ReLU" relu_param { negative_slope: 0.1 }', [(2, 3, 4, 5)])
