//! Ferro node agent: registers its Node and drives the host towards what the API wants.
