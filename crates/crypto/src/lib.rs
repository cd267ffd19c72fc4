//! National commercial cryptography (SM2/SM3/SM4), KDFs, the QKD + ML-KEM hybrid
//! combiner and secret types for qkdnet's service layer.
