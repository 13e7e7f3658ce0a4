"""kubetune's data plane: prepare data, train with Composer, convert, register."""
