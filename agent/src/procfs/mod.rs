//! Pure parsers for `/proc` and `/sys` files.
