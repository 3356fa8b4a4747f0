import os


def main(block_input, backpack):
    """Greets whoever `block_input["name"]` is; remembers it in the backpack."""
    name = (block_input or {}).get("name", "world")
    backpack["greeted"] = name
    print(f"greeting {name}")
    return f"{os.environ['GREETING']}, {name}"
