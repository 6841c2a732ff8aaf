"""Empty classes that Axolotl and PEFT test layers against with isinstance; nothing is ever one of them."""


class Params4bit:
    pass


class Linear4bit:
    pass


class Linear8bitLt:
    pass


class Int8Params:
    pass
